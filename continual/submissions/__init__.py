"""Reference submissions for the competition harness (docs/COMPETITION.md)."""
