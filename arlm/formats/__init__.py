"""Model files: arlm checkpoint folders, Hugging Face import/export, GGUF export."""
