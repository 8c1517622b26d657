"""Diagnostics: the job round trip `appliance doctor` uses to prove the worker answers."""
