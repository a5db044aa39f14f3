"""The HTP's integer arithmetic, one module per op family; model.py builds the simulation."""
