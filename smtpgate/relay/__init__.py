"""relay - the next hop: one Postfix connection per relayed transaction, with XCLIENT."""
