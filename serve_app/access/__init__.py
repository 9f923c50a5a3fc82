"""Who may use which model and how much: client keys, their limits and their usage."""
