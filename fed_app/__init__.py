"""fedvec's Flower apps and the federated maths beside them."""
