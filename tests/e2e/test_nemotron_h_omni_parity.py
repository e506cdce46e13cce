"""Nemotron-H Omni: the three services, as separate processes, give transformers' greedy tokens."""

from tests.parity import family_services, model_info_test, parity_tests

services = family_services("nemotron_h_omni")
test_parity = parity_tests("nemotron_h_omni")
test_model_info = model_info_test("nemotron_h_omni")
