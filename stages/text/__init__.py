"""Text shared by several stages: tokenizing and linking words to KG entities."""
