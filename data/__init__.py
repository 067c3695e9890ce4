"""Data: the conversation schema, the HuatuoGPT chat template, readers, mixing and batching."""
