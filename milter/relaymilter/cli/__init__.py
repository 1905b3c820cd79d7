"""relaymilter.cli."""
