"""Stage 1, the graph: load the model, fix its shapes, fold it as SNPE's converter does, and find
what SNPE quantizes in it (targets)."""
