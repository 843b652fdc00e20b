"""llmc-lessons: GPT-2 (124M) rebuilt one layer at a time, after Karpathy's llm.c.

The backend (GPU through CuPy, or CPU with the kernel emulator) is chosen in `llmc_lessons.device`.
"""
__version__ = "0.1.0"
