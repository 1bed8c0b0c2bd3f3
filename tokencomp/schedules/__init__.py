"""Built-in schedule plugins: where to drop and how much to keep. Shipped YAML recipes live in the
repository's top-level ``schedules/`` folder (installed as ``tokencomp.recipes``)."""
