"""People rank responses and judge policies in a browser: python -m align.label."""
