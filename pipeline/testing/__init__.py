"""Test and benchmark helpers shipped with the library: phantoms, position volumes, fault injection."""
