"""Kubernetes manifests for one training job: a KubeRay RayJob (with its ConfigMap and
NetworkPolicy), or a standalone RayCluster. Pure functions from a JobConfig and a plan to objects
as plain dicts; nothing here talks to a cluster. What those objects use is installed once from
``deploy/k8s`` (``kubectl apply -k deploy/k8s/overlays/<name>``), whose RayCluster has the same
shape as the ones rendered here.

names: names, labels, fixed places; sizing: the cluster's size from the plan; pods: locked-down
pod templates; render: the objects; command: `orchestrator k8s render`.
"""
