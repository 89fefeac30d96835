"""`lcc eval`: datasets (data.py), the conditions and their answers (run.py), SQuAD scoring
(scoring.py), and the report (report.py)."""
