"""policy - each stage's checks in order: facts in, decisions out; no socket is written here."""
