from django.contrib.auth import views as auth_views
from django.urls import path

from governance.portal import views

app_name = "portal"

urlpatterns = [
    path("", views.home, name="home"),
    path("cases/<int:case_id>/", views.case_page, name="case"),
    path("cases/<int:case_id>/status.json", views.case_status, name="case_status"),
    path("cases/<int:case_id>/transition/", views.case_transition, name="case_transition"),
    path("cases/<int:case_id>/comments/", views.case_comment, name="case_comment"),
    path("cases/<int:case_id>/comments/<int:comment_id>/resolve/", views.case_comment_resolve,
         name="case_comment_resolve"),
    path("cases/<int:case_id>/artifact/<int:artifact_id>/", views.artifact, name="artifact"),
]

auth_urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="portal/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
