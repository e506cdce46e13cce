"""Nemotron-H Omni: the three services, as separate processes, give transformers' greedy tokens."""

from tests.parity import family_services, parity_tests

services = family_services("nemotron_h_omni")
test_parity = parity_tests("nemotron_h_omni")
