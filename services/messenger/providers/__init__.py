"""How a decided message reaches a real provider (Twilio, SMTP, SendGrid) or the sandbox outbox."""
