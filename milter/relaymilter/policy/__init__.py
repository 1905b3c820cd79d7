"""relaymilter.policy."""
