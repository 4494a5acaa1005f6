"""Click-log data: schema, reading, validation and the synthetic default data set."""
