"""Writing, verifying and reading WebDataset shards of JPEG images."""
