"""Policy test data: good and bad policy files, and `kit`, what the policy tests share."""
