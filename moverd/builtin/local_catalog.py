"""The embedded default catalog (SQLite in the state directory). Being written."""
