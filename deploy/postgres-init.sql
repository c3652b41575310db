-- One database per service: each service owns its tables.
CREATE DATABASE consent OWNER sightline;
CREATE DATABASE collector OWNER sightline;
CREATE DATABASE insights OWNER sightline;
