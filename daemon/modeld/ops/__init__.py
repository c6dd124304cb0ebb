"""Operations: events, backend output, metrics, systemd notification and logging setup."""
