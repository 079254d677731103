"""Small models for the experiments (the library a user imports lives one level up)."""
