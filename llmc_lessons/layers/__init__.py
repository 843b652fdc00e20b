"""The layers of GPT-2, one module each, in the order the data moves: NumPy references and kernel launchers.
LLaMA's new layers (lesson 15) sit beside them: rmsnorm, rope, swiglu."""
