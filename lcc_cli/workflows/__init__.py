"""The workflows behind the commands (api.py re-exports them): the only modules that combine
format/, runtime/, compile/ and backends/."""
