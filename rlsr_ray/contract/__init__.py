"""The Arrow contract between pools: the tables' schemas and checks (batch.py), row pieces of tables
held by ref (selection.py), and which rows a learner packs into one forward/backward (micro_batches.py)."""
