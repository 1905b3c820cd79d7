"""DNS blocklists (see relaymilter.dnsbl.checker)."""
