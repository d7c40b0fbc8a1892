"""dsv4.cluster."""

from importlib import metadata


def package_version() -> str:
    """The installed dsv4 distribution's version (`dsv4 --version`, GetServerInfo)."""
    try:
        return metadata.version("dsv4")
    except metadata.PackageNotFoundError:
        return "unknown"
