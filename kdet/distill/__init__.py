"""Knowledge distillation: pairing a teacher with a student, the losses, and the distiller."""
