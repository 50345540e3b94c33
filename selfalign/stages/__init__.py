"""One module per SELF-ALIGN stage; each reads the previous stage's files and writes its own."""
