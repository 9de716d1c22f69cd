"""Model builders. They take plain arguments and never import the data or tuning code."""
