"""relaymilter.popwatch."""
