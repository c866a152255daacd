"""Packaging from nbdev's settings.ini (the nbdev 2.4 convention)."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini")
cfg = cfg["DEFAULT"]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    keywords=cfg["keywords"].split(),
    author=cfg["author"],
    author_email=cfg["author_email"],
    url=cfg["git_url"],
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3"],
    packages=setuptools.find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    python_requires=">=" + cfg["min_python"],
    install_requires=cfg["requirements"].split(),
    extras_require={"dev": cfg["dev_requirements"].split(), # nbdev, papermill, pytest, ...
                    "unlearn": cfg.get("unlearn_requirements", "").split()}, # eval-unlearn (Python >= 3.11 only)
    # pyproject.toml (rewritten by nbdev_export) declares these fields dynamic, so setup.py must set each one
    entry_points={"nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
                  "console_scripts": cfg.get("console_scripts", "").split(), # ant-nb-multi, ant-nb-study, ant-nb-multistudy
                  "eval_unlearn.techniques": cfg.get("unlearn_techniques", "").split()}, # ant_nb.interop.unlearn.TECHNIQUES
    scripts=[],
    include_package_data=True,
    zip_safe=False,
)
