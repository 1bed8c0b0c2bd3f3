"""Built-in mergers: fold dropped vision tokens into kept ones or into summary tokens."""
