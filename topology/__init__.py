"""Declarative topology: sources, tables, topics (and later mappings and rules), from YAML."""
