"""Secure aggregation over Flower's Message API (SecAgg, Bonawitz et al. 2017, with
SecAgg+'s double masking): the server learns the sum of the clients' fixed-point
vectors and nothing else, even when clients drop out up to a threshold.

``fixed_point`` maps floats into Z_2^64, ``keys`` holds the cryptography (X25519 + HKDF,
a ChaCha20 PRG, Fernet and Shamir from ``flwr.common.secure_aggregation``), ``client``
and ``server`` are the two sides of the protocol as functions on bytes and arrays, and
``rounds`` drives the stages through a Flower Grid.
"""
