"""An example reward package: plain functions, no openrl import needed."""
