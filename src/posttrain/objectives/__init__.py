"""Pure objectives: advantages, policy losses, aggregation, KL, value and preference losses."""
