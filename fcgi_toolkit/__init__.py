"""fcgi_toolkit: WSGI apps as FastCGI workers under supervisord, behind nginx."""

__version__ = "0.1.0"
