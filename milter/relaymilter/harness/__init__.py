"""relaymilter.harness."""
