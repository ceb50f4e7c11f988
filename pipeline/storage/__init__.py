"""The storage layer: every read, write, listing and delete of an output location
(`store.Store`), the output layout and resume scan (`output`), the lock, the tables and
their schemas, and the rule that keeps credentials out of URLs."""
