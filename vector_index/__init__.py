"""Local vector store on faiss: data sets, partitioners, codebook injection, search.

Knows nothing of Flower: every function here works on numpy arrays and faiss objects.
"""
