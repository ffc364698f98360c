"""REALM's data: tokenisation, blocks, QA sets, masking, loaders."""
