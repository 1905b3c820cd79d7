"""relaymilter.store."""
