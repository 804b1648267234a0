"""`moecompress compress`: several operations chained in one layer-streamed pass (see recipe.py and run.py)."""
