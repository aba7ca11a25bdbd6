"""Kubernetes objects as Propolis sees them: the watched kinds, their normalized form, the reflector."""
