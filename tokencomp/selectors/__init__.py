"""Built-in selector plugins: turn scores and a budget into kept tokens."""
