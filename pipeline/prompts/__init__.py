"""The prompt bank: vocabularies (files, columns, built-ins) and their cached text
embeddings."""
